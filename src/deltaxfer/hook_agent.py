"""The action script of a dump started by `deltaxfer migrate`: the shortest way from CRIU's
post-dump to the migration agent, because CRIU runs it inside the freeze.

CRIU execs the agent's wrapper, which runs this file by its path with ``python -I -S``:
no site packages, no deltaxfer import, only the standard library (interpreter start
~20 ms here against ~40 ms for ``python -m deltaxfer.hook``). It sends the action to the
agent's unix socket ($DELTAXFER_AGENT) and exits with the agent's verdict: 0 lets CRIU go
on, 1 makes it resume the tasks (the rollback). Anything other than a clean answer —
the agent gone, a reply it cannot read — hands over to the full hook (``python -m
deltaxfer.hook``, with the same environment), which knows what to do then (ending a
lazy dump nobody will end, the messages). Actions other than pre-dump / post-dump need
nothing from the agent: exit 0.

Why the full hook's leave-running check is not needed here: the agent starts criu with
--leave-stopped on its command line, which wins over any configuration file, and refuses
--leave-running among the operator's --criu-opt and --criu-config.
"""
import json
import os
import socket
import sys

# the names the agent and its hooks share (hook_env.py, beside this file), read without
# importing the package (-I -S: it is not on the path)
_names: dict = {}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hook_env.py")) as _f:
    exec(compile(_f.read(), "hook_env.py", "exec"), _names)
AGENT_ENV, TIMEOUT_ENV, AGENT_FAILED_ENV = (
    _names["AGENT_ENV"], _names["TIMEOUT_ENV"], _names["AGENT_FAILED_ENV"])


def _full_hook(failed: str | None = None) -> None:
    """Hand over to `python -m deltaxfer.hook`; ``failed``: the agent was asked and did not
    answer (the full hook must not ask again: a second post-dump would run the final
    round twice) -- it then does what an agent's death asks for."""
    env = dict(os.environ)
    if failed is not None:
        env[AGENT_FAILED_ENV] = failed
    os.execve(sys.executable, [sys.executable, "-m", "deltaxfer.hook"], env)


def ask_agent(agent: str, action: str, env) -> dict:
    """One exchange with the agent at its unix socket: the action (and CRIU's image
    directory and init pid) out, the verdict {"ok": ..., "reason": ...} back. OSError or
    ValueError when there is no verdict (also used by the full hook)."""
    timeout = float(env.get(TIMEOUT_ENV, "0")) or None
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(agent)
        s.sendall(json.dumps({"action": action, "image_dir": env.get("CRTOOLS_IMAGE_DIR"),
                              "init_pid": env.get("CRTOOLS_INIT_PID")}).encode() + b"\n")
        line = s.makefile("rb").readline()
    if not line:
        raise ConnectionError("it closed the connection without an answer")
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ValueError(f"unreadable answer {line[:80]!r}")
    return reply


def main() -> int:
    env = os.environ
    action = env.get("CRTOOLS_SCRIPT_ACTION", "")
    if action not in ("pre-dump", "post-dump"):
        return 0
    agent = env.get(AGENT_ENV)
    if not agent:
        _full_hook()
    try:
        reply = ask_agent(agent, action, env)
    except (OSError, ValueError) as e:
        _full_hook(f"the migration agent is gone ({e})")
    if reply.get("ok"):
        return 0
    print(f"deltaxfer hook: {action} failed: {reply.get('reason')}; criu resumes the tasks",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
