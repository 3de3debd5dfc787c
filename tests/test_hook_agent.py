"""The agent-mode action script, in its two forms -- the compiled one `migrate` uses
(deltaxfer/_hook_agent, ext/hook/hook_agent.c) and the Python reference and fallback
(deltaxfer/hook_agent.py, `python -I -S`), both run by CRIU inside the freeze: it asks the
agent once and exits with its verdict; an agent that does not answer hands over to the
full hook, which does not ask again."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import deltaxfer
from deltaxfer.hook_env import AGENT_ENV, PYTHON_ENV, TIMEOUT_ENV

SCRIPT = Path(deltaxfer.__file__).parent / "hook_agent.py"
COMPILED = Path(deltaxfer.__file__).parent / "_hook_agent"
FORMS = {"compiled": [str(COMPILED)], "python": [sys.executable, "-I", "-S", str(SCRIPT)]}


@pytest.fixture(params=sorted(FORMS))
def form(request):
    if request.param == "compiled":
        assert os.access(COMPILED, os.X_OK), "the build makes deltaxfer/_hook_agent"
    return request.param


class FakeAgent:
    """A unix socket that answers each connection with ``reply`` (None: close without one)
    and counts the connections and the actions it got."""

    def __init__(self, path: str, reply):
        self.path, self.reply, self.actions, self.requests = path, reply, [], []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                self.requests.append(json.loads(c.makefile("rb").readline()))
                self.actions.append(self.requests[-1]["action"])
                if self.reply is not None:
                    c.sendall(json.dumps(self.reply).encode() + b"\n")

    def close(self):
        self.sock.close()


def run_hook(action: str, agent: str | None, form: str = "python",
             **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
    e.update({"CRTOOLS_SCRIPT_ACTION": action, "CRTOOLS_IMAGE_DIR": "/nonexistent",
              TIMEOUT_ENV: "5", "DELTAXFER_CONFIG": "/nonexistent/hook.conf",
              PYTHON_ENV: sys.executable, **env})
    if agent:
        e[AGENT_ENV] = agent
    return subprocess.run(FORMS[form], env=e, capture_output=True, text=True, timeout=60)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "agent.sock")


def test_verdicts_pass_through(sock_path, form):
    agent = FakeAgent(sock_path, {"ok": True})
    try:
        assert run_hook("post-dump", sock_path, form).returncode == 0
        agent.reply = {"ok": False, "reason": "the final round failed: X"}
        p = run_hook("post-dump", sock_path, form)
        assert p.returncode == 1 and "the final round failed: X" in p.stderr
        assert agent.actions == ["post-dump", "post-dump"]
        # other actions never reach the agent
        assert run_hook("post-restore", sock_path, form).returncode == 0
        assert run_hook("network-lock", sock_path, form).returncode == 0
        assert agent.actions == ["post-dump", "post-dump"]
    finally:
        agent.close()


def test_an_agent_without_an_answer_is_asked_once(sock_path, form):
    """The agent closes without answering: the full hook takes over (exit 1: CRIU resumes
    the tasks) and does not connect again -- a second post-dump could run the final
    round twice."""
    agent = FakeAgent(sock_path, None)
    try:
        p = run_hook("post-dump", sock_path, form)
        time.sleep(0.2)
        assert p.returncode == 1, p.stderr
        assert "the migration agent is gone" in p.stderr
        assert agent.actions == ["post-dump"]
    finally:
        agent.close()


def test_no_agent_socket_fails_the_dump(tmp_path, form):
    p = run_hook("post-dump", str(tmp_path / "absent.sock"), form)
    assert p.returncode == 1 and "the migration agent is gone" in p.stderr


def test_starts_faster_than_the_full_hook(sock_path):
    """What it is for: less interpreter start inside the freeze. Measured, not asserted
    as a time: the fast path imports no deltaxfer module."""
    agent = FakeAgent(sock_path, {"ok": True})
    try:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
        e.update({"CRTOOLS_SCRIPT_ACTION": "post-dump", AGENT_ENV: sock_path})
        code = f"import runpy; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
        p = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", code],
                           env=e, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
        imported = [ln.split("|")[-1].strip() for ln in p.stderr.splitlines()
                    if ln.startswith("import time:")]
        assert imported and not any(m.startswith("deltaxfer") for m in imported), imported
    finally:
        agent.close()


def test_compiled_form_sends_what_the_python_form_sends(sock_path):
    """The request line: the same JSON (strings escaped, a missing variable null)."""
    agent = FakeAgent(sock_path, {"ok": True})
    try:
        odd = '/tmp/a "quoted"\\dir\twith\ncontrols'
        for form in ("python", "compiled"):
            assert run_hook("pre-dump", sock_path, form, CRTOOLS_IMAGE_DIR=odd).returncode == 0
        got = agent.requests
        assert got[0] == got[1] == {"action": "pre-dump", "image_dir": odd, "init_pid": None}
    finally:
        agent.close()


def test_migrate_uses_the_compiled_form(tmp_path):
    """`migrate` points CRIU at the compiled action script when the build made it."""
    from deltaxfer.migrate import Agent

    agent = Agent.__new__(Agent)
    agent.work = str(tmp_path)
    assert agent.write_hook_wrapper() == str(COMPILED)
