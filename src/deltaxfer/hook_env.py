"""What the migration agent tells its action script (``deltaxfer-hook``, run by CRIU) through
the environment CRIU passes on: a module of its own so that the agent (migrate.py) and the
hook (hook.py) share the names without importing each other."""

AGENT_ENV = "DELTAXFER_AGENT"          # the agent's unix socket
LAZY_PORT_ENV = "DELTAXFER_LAZY_PORT"  # the lazy dump's port, to end it if the agent is gone
TIMEOUT_ENV = "DELTAXFER_HOOK_TIMEOUT"  # seconds to wait for the agent's verdict
# set by hook_agent.py when it asked the agent and got no answer: the full hook it hands
# over to must not ask again (a second post-dump would run the final round twice)
AGENT_FAILED_ENV = "DELTAXFER_AGENT_FAILED"
# the Python the compiled action script (deltaxfer/_hook_agent) hands over to when the
# agent does not answer: `$DELTAXFER_PYTHON -m deltaxfer.hook`
PYTHON_ENV = "DELTAXFER_PYTHON"
